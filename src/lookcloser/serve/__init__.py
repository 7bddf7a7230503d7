"""`lookcloser serve`: a REST API and a web page for identification with heatmaps."""
