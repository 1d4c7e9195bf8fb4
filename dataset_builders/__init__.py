"""The data layer of hf-mobility: canonical tables, readers, synthetic cities, preprocessing and publishing."""
