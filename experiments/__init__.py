"""The paper's benchmark commands: thin command-line front ends over ``core.benchmark``."""
