"""``python -m mltrack`` = the ``mltrack`` command."""
from mltrack.cli import main

if __name__ == "__main__":
    main()
