"""What a result becomes: the packed file on disk and the execution paths (dense, sparse, int8) at run time."""
