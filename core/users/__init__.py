"""The user store: local domains, users with Argon2id password hashes, and aliases.

``store`` defines the backend-neutral interface and the address rules, ``sqlite`` the
embedded default backend, ``passwords`` the hashing, and ``cli`` the ``mailgate user``,
``mailgate alias`` and ``mailgate domain`` commands.
"""
