//! Fleet tooling: real brokers for tests and the demo, a generator of
//! factory archives, and the end-to-end demo.

pub mod broker;
pub mod compare;
pub mod demo;
pub mod dst;
pub mod gen;
pub mod ideal;
pub mod procs;
pub mod proxy;
pub mod tree;
