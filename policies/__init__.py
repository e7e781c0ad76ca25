"""mailgate.policies: transport-free decision logic and the YAML rule language."""
