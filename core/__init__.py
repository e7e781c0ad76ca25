"""mailgate.core: the minimal MTA (SMTP listeners, spool, local delivery, users, CLI)."""
