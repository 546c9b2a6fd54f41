//! The codec of every generated service and client: prost, with buffers
//! sized for this API's messages instead of tonic's 8 KiB per direction
//! per call.
//!
//! tonic gives each call an encode and a decode buffer of the codec's
//! `buffer_size` up front. Most messages here are a few hundred bytes, and
//! a fleet keeps one HeartbeatStream (and often a WatchEvents stream) open
//! per agent, so 8 KiB a direction is most of what an open stream costs:
//! at 100,000 streams, 800 MB of decode buffers alone. A buffer grows when
//! a larger message needs it, so only the first allocation is smaller; the
//! yield threshold (when a large response is handed on in parts) keeps
//! tonic's default.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes each call's encode and decode buffer starts with.
pub const BUFFER_BYTES: usize = 512;

/// tonic's default yield threshold.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost with [`BUFFER_BYTES`] buffers (named by `build.rs` as the codec
/// of the generated code).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec {
            _messages: PhantomData,
        }
    }
}

/// The buffer settings of every call's encoder and decoder (WatchEvents'
/// own codec uses them too).
pub(crate) fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
