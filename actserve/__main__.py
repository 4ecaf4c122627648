"""`python -m actserve` runs the command line."""
import sys

from actserve.cli import main

sys.exit(main())
