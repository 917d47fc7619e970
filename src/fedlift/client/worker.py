"""Entry point of a site's worker process: ``python -m fedlift.client.worker``."""

from ._worker import main

if __name__ == "__main__":
    main()
