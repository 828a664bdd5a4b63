"""The other methods of SCI's field, each one module with its model (and loss where it has its own);
models.METHODS registers them (METHOD.md section 12)."""
