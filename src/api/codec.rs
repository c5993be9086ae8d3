//! The gRPC codec of the service: prost's, except that a request message that does not decode
//! (bad wire format, a string that is not UTF-8) is the caller's error, `INVALID_ARGUMENT`,
//! where prost's codec says `INTERNAL`, and so is a second message in a call whose request is
//! one message (every method of the service: none streams its requests). tonic's unary and
//! server-streaming handlers read the request body to its end before answering, through the
//! same decoder, so the second message fails the call instead of being dropped unread.

use prost::Message;
use std::any::TypeId;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// [`ProstCodec`] with decode errors as `INVALID_ARGUMENT` (named in `build.rs`).
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        StrictCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = StrictDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder {
            inner: self.0.decoder(),
            one_message: is_request::<U>(),
            decoded: 0,
        }
    }
}

/// Whether `U` is one of the service's request messages, which come one per call. (The same
/// codec decodes the client's answers, where `ReadModule` and `Prefetch` stream many.)
fn is_request<U: 'static>() -> bool {
    use super::proto::*;
    [
        TypeId::of::<FetchRequest>(),
        TypeId::of::<StatRequest>(),
        TypeId::of::<ListRequest>(),
        TypeId::of::<RemoveRequest>(),
        TypeId::of::<ReadModuleRequest>(),
        TypeId::of::<PrefetchRequest>(),
        TypeId::of::<PinRequest>(),
        TypeId::of::<LeaseRequest>(),
        TypeId::of::<ReleaseLeaseRequest>(),
        TypeId::of::<GcRequest>(),
        TypeId::of::<UsageRequest>(),
        TypeId::of::<VerifyRequest>(),
    ]
    .contains(&TypeId::of::<U>())
}

/// A decoder whose failures are the sender's: `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct StrictDecoder<D> {
    inner: D,
    /// Whether a call carries exactly one of these messages.
    one_message: bool,
    /// How many messages this call has decoded.
    decoded: usize,
}

impl<D: Decoder<Error = Status>> Decoder for StrictDecoder<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        if self.one_message && self.decoded > 0 {
            return Err(Status::invalid_argument(
                "the call carries more than one request message; this method takes one",
            ));
        }
        let item = self
            .inner
            .decode(buf)
            .map_err(|status| match status.code() {
                Code::Internal => Status::invalid_argument(format!(
                    "the message does not decode: {}",
                    status.message()
                )),
                _ => status,
            })?;
        self.decoded += usize::from(item.is_some());
        Ok(item)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
