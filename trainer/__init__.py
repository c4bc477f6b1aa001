"""D3SR trainer (``python trainer/train.py``); see README "Training"."""
