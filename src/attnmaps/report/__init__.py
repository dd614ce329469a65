"""Pictures and the one-file HTML report of a run (``attnmaps report``)."""
