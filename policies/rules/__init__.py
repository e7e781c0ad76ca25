"""mailgate.policies.rules: the YAML rule language shared by every policy daemon."""
