"""The durable spool and local delivery: a message's life from "250 OK" until it is delivered.

``queue_id`` makes the identifiers, ``envelope`` holds what SMTP learned about a message
and the delivery progress, ``spool`` keeps both with the message bytes on disk (accept =
fsync'd), ``maildir`` writes into mailboxes, ``delivery`` drives messages from the spool
into them, and ``cli`` is ``mailgate queue``.
"""
