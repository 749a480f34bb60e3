//! tickfleet-operator binary.
fn main() {}
