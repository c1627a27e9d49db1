"""Tools beside the command line: the demo, model making and sample images; may use every stage."""
