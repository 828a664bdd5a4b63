"""The other methods of SCI's field, each one module with its model (and loss and stage 1 where it has its
own); models.METHODS registers them (METHOD.md sections 12-14). models is imported first: the
reconstructions build on its classes, and it imports them after defining those."""
import models  # noqa: F401
