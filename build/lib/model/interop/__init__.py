"""Interop with the authors' MagicDriveDiT: checkpoint conversion, their forward layout (magicdrivedit.py),
their configs (authors_config.py), the parity fixtures' format (fixture_io.py; the generator that runs their
code is tools/make_magicdrivedit_fixture.py, outside the product)."""
