//! Redis plumbing, knowing nothing of nodes or messages: one connection
//! type and pipelines for a single Redis and Redis Cluster alike
//! ([`conn`]; a single Redis over plain TCP is reached through [`mux`], a
//! connection with a reply reader of its own), the cluster's slot map
//! ([`slots`]), and the atomic scripts ([`lua`]), each on one hash slot.

pub mod conn;
pub mod lua;
mod mux;
pub mod slots;
