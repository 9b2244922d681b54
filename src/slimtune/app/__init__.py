"""The application: the ``slimtune`` command line and its commands, method comparison, the demo, the bundled
model and corpus loaders and the tasks on them. Imports the core and the training layer; nothing imports it."""
