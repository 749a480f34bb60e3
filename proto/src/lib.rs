//! tickfleet's wire format.
//!
//! * [`v1`] holds the generated protobuf types (and, later, the gRPC service) from `proto/tickfleet/v1`.
//! * [`Tick`] is the domain model every other crate works with: exact decimals ([`rust_decimal::Decimal`]),
//!   never `f64`.
//! * [`decode`] turns a Kafka message (key + payload) into a validated [`Tick`], or a [`DecodeError`] whose
//!   [`reason`](DecodeError::reason) is a short, stable code fit for a dead-letter header or a metric label.

mod decode;
mod tick;

pub use decode::{
    DEFAULT_MAX_AHEAD_NS, DEFAULT_MAX_BEHIND_NS, DERIVED_SEQ_BIT, DecodeError, Format, Limits,
    decode, decode_json, decode_protobuf,
};
pub use tick::{Tick, TickId};

/// Generated protobuf types of package `tickfleet.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("tickfleet.v1");
}

/// The encoded `FileDescriptorSet` of every tickfleet proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tickfleet_descriptor");
