"""Outbound delivery: the outbound queue and its scheduler (queue), one delivery attempt
(attempt), MX resolution (mx), routes (routes), the SMTP client (client), connection reuse
(pool), and delivery status notifications (dsn, notices). See docs/relay.md."""
