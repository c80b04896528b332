"""Command-line tools around mtnlg checkpoints (the logic lives in ``mtnlg.checkpoint``)."""
