//! The one way in: the facade's typed calls ([`ops`]) and answers ([`types`]), and the control
//! protocol that carries them over the socket. The CLI reading a state, the socket server and
//! every face to come answer through [`ops`].

#[cfg(feature = "runtime")]
pub mod ops;
pub mod protocol;
pub mod types;
