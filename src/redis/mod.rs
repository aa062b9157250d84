//! Redis plumbing, knowing nothing of nodes or messages: one connection
//! type and pipelines for a single Redis and Redis Cluster alike
//! ([`conn`]), the cluster's slot map ([`slots`]), and the atomic scripts
//! ([`lua`]), each on one hash slot.

pub mod conn;
pub mod lua;
pub mod slots;
