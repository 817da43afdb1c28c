"""AfD (alignment from demonstrations): extrapolation over a demo-vs-sample reward."""
