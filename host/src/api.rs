//! The one way in: the control protocol's typed messages and frames, shared by both ends of
//! the socket.

pub mod protocol;
