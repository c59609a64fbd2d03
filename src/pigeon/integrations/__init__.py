"""Task frameworks on pigeon's broker: one subpackage per framework, imported only when used
(``pip install 'pigeon-queue[celery]'`` for ``pigeon.integrations.celery``, ``[dramatiq]``
for ``pigeon.integrations.dramatiq``, ``[taskiq]`` for ``pigeon.integrations.taskiq``)."""
