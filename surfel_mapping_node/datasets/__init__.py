"""Dataset readers behind one interface (see base.Dataset)."""
