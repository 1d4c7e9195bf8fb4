"""Model folders of hf-mobility (one self-contained folder per method, loadable with ``trust_remote_code``)."""
