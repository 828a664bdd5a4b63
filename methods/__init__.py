"""The other methods of SCI's field, each one module with its model (and loss and stage 1 where it has its
own); registry.METHODS registers them (METHOD.md sections 12-14)."""
