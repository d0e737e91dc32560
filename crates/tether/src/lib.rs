//! tether: connections that survive.
#![warn(missing_docs)]

pub mod transport;
