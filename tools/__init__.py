"""Scripts that run outside the product: the parity-fixture generator for the authors' code (AGPL-3.0, read for facts, never imported by model/ train/ pipeline/ captions/)."""
