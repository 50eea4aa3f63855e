"""python -m captions ... == mdv2-caption ..."""
import sys

from captions.cli import main

sys.exit(main())
