"""Interop with the authors' MagicDriveDiT: checkpoint conversion, their forward layout (magicdrivedit.py),
their configs (authors_config.py), and the parity-fixture script the parity engineer keeps (make_fixture.py)."""
