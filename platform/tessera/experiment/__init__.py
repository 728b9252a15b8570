"""Experiments: the cells' jobs, the selection rule and the comparison report (shared by the operator
and the embedded runner; the matrix itself is the API type's, `tessera.api.experiment`)."""
