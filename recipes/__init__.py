"""The example recipes (`glue.py`, `vision.py`, their experiment runners), installed as `stompp_hf_recipes`."""
