//! The service's protobuf codec: prost's, except that a message that does
//! not decode (a wrong wire type, invalid UTF-8, a truncated field) is the
//! contract's `INVALID_ARGUMENT` with its details, not tonic's bare
//! `INTERNAL` (which pages someone). `build.rs` makes the generated code use
//! it.

use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::error::{FieldViolation, ServiceError};

pub struct ContractCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ContractCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for ContractCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ContractDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ContractDecoder(self.0.decoder())
    }
}

pub struct ContractDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for ContractDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|_| {
            Status::from(ServiceError::InvalidArgument(vec![FieldViolation {
                field: "request",
                description: "the request is not a valid protobuf message of its type".to_owned(),
            }]))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
