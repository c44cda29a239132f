//! zstd files read frame by frame, so damage costs one frame and not the rest of the file.
//!
//! The archive writer compresses each write batch as one zstd frame (with zstd's content
//! checksum), and a batch holds whole records, so every frame starts at a record boundary. A
//! plain streaming decoder stops at the first damaged byte and loses everything after it; this
//! reader decodes one frame at a time and, when a frame does not decode, looks for the next
//! frame's magic number and goes on from there. Offsets it reports are offsets in the file as
//! stored (compressed), which is what `dd` or a hex editor needs.
//!
//! Frames are held whole in memory, decoded; the writer's are a few MiB. A frame that would
//! decode to more than [`MAX_FRAME`] (not written by teeway) is reported and skipped.

use std::io::{self, Read};

use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

/// The zstd frame magic number, as stored.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Largest decoded frame accepted: far above the writer's batches (4 MiB plus one record).
pub const MAX_FRAME: usize = 256 << 20;
/// Bytes read from the file at a time.
const READ_CHUNK: usize = 256 << 10;

/// One step through a zstd file.
#[derive(Debug)]
pub enum Frame {
    /// A frame that decoded (and whose checksum, if it has one, matched).
    Data {
        /// Offset of the frame in the file.
        offset: u64,
        /// Its decoded bytes.
        bytes: Vec<u8>,
    },
    /// Bytes that are not a frame that decodes; reading goes on at the next frame.
    Damaged {
        /// Offset of the first byte skipped.
        offset: u64,
        /// Bytes skipped.
        skipped: u64,
        /// Why.
        why: String,
    },
    /// A frame that decodes to more than [`MAX_FRAME`] (a file compressed whole by another
    /// tool, or by an older teeway): not read here; the caller reads it as a stream from
    /// `offset`. Nothing after it is read by this reader.
    TooLarge {
        /// Offset of the frame.
        offset: u64,
    },
    /// The file ends inside a frame: a writer stopped mid-write.
    Torn {
        /// Offset of the cut frame.
        offset: u64,
        /// Bytes of it in the file.
        len: u64,
    },
    /// The end of the file, at a frame boundary.
    End,
}

/// Reads a zstd file one frame at a time.
pub struct Frames<R> {
    input: R,
    /// Compressed bytes read and not yet consumed (from the current frame's start).
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    offset: u64,
    eof: bool,
    decoder: Decoder<'static>,
}

impl<R> std::fmt::Debug for Frames<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frames")
            .field("offset", &self.offset)
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Frames<R> {
    /// A reader of the zstd file `input`.
    pub fn new(input: R) -> io::Result<Self> {
        Ok(Self {
            input,
            buf: Vec::new(),
            offset: 0,
            eof: false,
            decoder: Decoder::new()?,
        })
    }

    /// Reads more of the file into `buf`; false at its end.
    fn read_more(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let n = loop {
            match self.input.read(&mut self.buf[start..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.buf.truncate(start);
                    return Err(e);
                }
            }
        };
        self.buf.truncate(start + n);
        self.eof = n == 0;
        Ok(n > 0)
    }

    /// Drops the first `n` buffered bytes.
    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        self.offset += n as u64;
    }

    /// The next frame, damaged stretch, torn tail or the end. An I/O error reading the file is
    /// returned as such.
    pub fn next_frame(&mut self) -> io::Result<Frame> {
        while self.buf.len() < ZSTD_MAGIC.len() && self.read_more()? {}
        if self.buf.is_empty() {
            return Ok(Frame::End);
        }
        let offset = self.offset;
        if self.buf.len() < ZSTD_MAGIC.len() {
            let len = self.buf.len() as u64;
            self.consume(self.buf.len());
            return Ok(Frame::Torn { offset, len });
        }
        if self.buf[..4] != ZSTD_MAGIC {
            return self.resync(1, "no zstd frame starts here".into());
        }
        match self.decode() {
            Ok(Decoded::Whole(consumed, bytes)) => {
                self.consume(consumed);
                Ok(Frame::Data { offset, bytes })
            }
            Ok(Decoded::Cut) => {
                let len = self.buf.len() as u64;
                self.consume(self.buf.len());
                Ok(Frame::Torn { offset, len })
            }
            Ok(Decoded::TooLarge) => {
                self.eof = true;
                self.buf.clear();
                Ok(Frame::TooLarge { offset })
            }
            Err(why) => self.resync(1, why),
        }
    }

    /// Decodes the frame at `buf[0]`; `Err` when it does not decode.
    fn decode(&mut self) -> Result<Decoded, String> {
        self.decoder.reinit().map_err(|e| format!("zstd: {e}"))?;
        let mut out: Vec<u8> = Vec::new();
        let mut consumed = 0;
        loop {
            if consumed == self.buf.len() {
                match self.read_more() {
                    Ok(true) => {}
                    Ok(false) => return Ok(Decoded::Cut),
                    Err(e) => return Err(format!("read failed: {e}")),
                }
            }
            if out.capacity() - out.len() < READ_CHUNK {
                // Exact growth: the buffer never holds much more than MAX_FRAME.
                out.reserve_exact(READ_CHUNK.max(out.len() / 2));
            }
            let mut input = InBuffer::around(&self.buf[consumed..]);
            let pos = out.len();
            let mut output = OutBuffer::around_pos(&mut out, pos);
            let hint = self
                .decoder
                .run(&mut input, &mut output)
                .map_err(|e| format!("zstd frame does not decode: {e}"))?;
            consumed += input.pos();
            // Checked before a finished frame is taken too: no frame over the limit is held.
            if out.len() > MAX_FRAME {
                return Ok(Decoded::TooLarge);
            }
            if hint == 0 {
                return Ok(Decoded::Whole(consumed, out));
            }
        }
    }

    /// Skips from `buf[0]` to the next frame magic at or after `from`, dropping what it has
    /// scanned as it goes (a damaged tail of any length costs one read buffer of memory).
    fn resync(&mut self, from: usize, why: String) -> io::Result<Frame> {
        let offset = self.offset;
        let mut at = from.min(self.buf.len());
        loop {
            if let Some(i) = self.buf[at..]
                .windows(ZSTD_MAGIC.len())
                .position(|w| w == ZSTD_MAGIC)
            {
                self.consume(at + i);
                return Ok(Frame::Damaged {
                    offset,
                    skipped: self.offset - offset,
                    why,
                });
            }
            // Keep the last bytes: a magic may straddle two reads.
            let keep = self.buf.len().min(ZSTD_MAGIC.len() - 1);
            self.consume(self.buf.len() - keep);
            at = 0;
            if !self.read_more()? {
                self.consume(self.buf.len());
                return Ok(Frame::Damaged {
                    offset,
                    skipped: self.offset - offset,
                    why,
                });
            }
        }
    }
}

/// How a frame decoded.
enum Decoded {
    /// Its compressed length and its bytes.
    Whole(usize, Vec<u8>),
    /// The file ends inside it.
    Cut,
    /// It decodes to more than [`MAX_FRAME`].
    TooLarge,
}

/// One zstd frame of `raw`, with zstd's content checksum, as the archive writes each batch.
pub fn compress_frame(raw: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    compressor.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
    compressor.compress(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(bytes: &[u8]) -> Vec<Frame> {
        let mut f = Frames::new(bytes).expect("decoder");
        let mut out = Vec::new();
        loop {
            match f.next_frame().expect("no I/O error") {
                Frame::End => return out,
                frame => out.push(frame),
            }
        }
    }

    fn file(parts: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let mut file = Vec::new();
        let mut starts = Vec::new();
        for p in parts {
            starts.push(file.len());
            file.extend(compress_frame(p, 3).expect("compress"));
        }
        (file, starts)
    }

    #[test]
    fn a_flipped_byte_costs_its_frame_only() {
        let parts: Vec<Vec<u8>> = (0..3u8)
            .map(|i| (0..5000u32).map(|n| (n as u8) ^ i).collect())
            .collect();
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let (mut bytes, starts) = file(&refs);
        let inside_second = starts[1] + (starts[2] - starts[1]) / 2;
        bytes[inside_second] ^= 0x40;
        let frames = frames_of(&bytes);
        assert_eq!(frames.len(), 3, "{frames:?}");
        assert!(matches!(&frames[0], Frame::Data { offset: 0, bytes } if *bytes == parts[0]));
        match &frames[1] {
            Frame::Damaged {
                offset, skipped, ..
            } => {
                assert_eq!(*offset, starts[1] as u64, "the compressed offset");
                assert_eq!(*skipped, (starts[2] - starts[1]) as u64);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&frames[2], Frame::Data { offset, bytes } if *offset == starts[2] as u64 && *bytes == parts[2])
        );
    }

    #[test]
    fn a_cut_last_frame_is_torn_and_garbage_before_a_frame_is_skipped() {
        let (bytes, starts) = file(&[b"first batch", b"second batch"]);
        let cut = &bytes[..bytes.len() - 3];
        let frames = frames_of(cut);
        assert!(matches!(frames[0], Frame::Data { .. }));
        assert!(
            matches!(frames[1], Frame::Torn { offset, len } if offset == starts[1] as u64 && len == (bytes.len() - 3 - starts[1]) as u64),
            "{frames:?}"
        );
        let mut junk = b"junk!".to_vec();
        junk.extend_from_slice(&bytes);
        let frames = frames_of(&junk);
        assert!(
            matches!(
                frames[0],
                Frame::Damaged {
                    offset: 0,
                    skipped: 5,
                    ..
                }
            ),
            "{frames:?}"
        );
        assert_eq!(frames.len(), 3);
    }
}
