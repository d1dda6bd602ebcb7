"""The paper's benchmark commands: thin command-line front ends over ``core.measure.paper_suite``."""
