"""mailgate.core.milter: the MTA side of the Sendmail milter protocol (codec, client, chain)."""
