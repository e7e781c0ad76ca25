"""mailgate.core.smtp: the SMTP server (protocol engine, replies, limits, listeners)."""
