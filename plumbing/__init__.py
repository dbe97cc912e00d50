"""What the paper's modules need but the paper does not describe: model loading, data fetching, the built-in
problems, reading answers, run directories and the command lines."""
