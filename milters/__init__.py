"""mailgate.milters: the policy daemons, each speaking the Sendmail milter protocol."""
