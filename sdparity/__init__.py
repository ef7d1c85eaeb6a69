"""The `sdparity` command line: one front-end module per subcommand, over the libraries
scratch_sd (the model), parity (the harness) and benchmarks. Library code takes typed settings;
only this package reads argparse namespaces."""
