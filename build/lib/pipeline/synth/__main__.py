"""`python -m pipeline.synth`: the synthetic dataset writer's command line (mdv2-synth)."""
import sys

from pipeline.synth.cli import main

sys.exit(main())
