//! comet-py: the PyO3 module `comet`.
