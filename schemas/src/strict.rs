//! The strict MessagePack reader for the signed messages, [`SignedJob`] and [`Job`].
//!
//! Written by hand rather than through serde: rmp-serde lets a struct arrive as an array, a
//! byte string as a str (and the reverse) and a key as an integer, and a signed format should
//! have one reading only. Unknown keys are refused rather than skipped, so the reader never
//! descends into data it does not expect and needs no depth limit; lengths are checked against
//! the bytes left before anything is allocated.

use std::collections::BTreeMap;

use crate::codec::{Decode, DecodeError, WireType};
use crate::{Job, SignedJob, Task};

/// The head of one MessagePack value: its type and, for containers and strings, its length.
enum Head {
    Nil,
    Bool(bool),
    Uint(u64),
    /// A negative integer (a signed format holding a non-negative value reads as `Uint`).
    Negative(i64),
    Str(usize),
    Bin(usize),
    Array(usize),
    Map(usize),
    Other(WireType),
}

impl Head {
    fn wire_type(&self) -> WireType {
        match self {
            Head::Nil => WireType::Nil,
            Head::Bool(_) => WireType::Bool,
            Head::Uint(_) | Head::Negative(_) => WireType::Int,
            Head::Str(_) => WireType::Str,
            Head::Bin(_) => WireType::Bin,
            Head::Array(_) => WireType::Array,
            Head::Map(_) => WireType::Map,
            Head::Other(t) => *t,
        }
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn be(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// A big-endian length of `n` bytes.
    fn len(&mut self, n: usize) -> Result<usize, DecodeError> {
        // A length beyond the address space cannot fit in the bytes left either.
        usize::try_from(self.be(n)?).map_err(|_| DecodeError::Truncated)
    }

    fn signed(&mut self, n: usize) -> Result<Head, DecodeError> {
        let v = self.be(n)?;
        let bits = 8 * n as u32;
        // Sign-extend the `n`-byte two's complement value.
        let v = ((v << (64 - bits)) as i64) >> (64 - bits);
        Ok(match u64::try_from(v) {
            Ok(u) => Head::Uint(u),
            Err(_) => Head::Negative(v),
        })
    }

    fn head(&mut self) -> Result<Head, DecodeError> {
        let marker = self.take(1)?[0];
        Ok(match marker {
            0x00..=0x7f => Head::Uint(u64::from(marker)),
            0x80..=0x8f => Head::Map(usize::from(marker & 0x0f)),
            0x90..=0x9f => Head::Array(usize::from(marker & 0x0f)),
            0xa0..=0xbf => Head::Str(usize::from(marker & 0x1f)),
            0xc0 => Head::Nil,
            0xc1 => Head::Other(WireType::Reserved),
            0xc2 => Head::Bool(false),
            0xc3 => Head::Bool(true),
            0xc4 => Head::Bin(self.len(1)?),
            0xc5 => Head::Bin(self.len(2)?),
            0xc6 => Head::Bin(self.len(4)?),
            0xc7..=0xc9 | 0xd4..=0xd8 => Head::Other(WireType::Ext),
            0xca | 0xcb => Head::Other(WireType::Float),
            0xcc => Head::Uint(self.be(1)?),
            0xcd => Head::Uint(self.be(2)?),
            0xce => Head::Uint(self.be(4)?),
            0xcf => Head::Uint(self.be(8)?),
            0xd0 => self.signed(1)?,
            0xd1 => self.signed(2)?,
            0xd2 => self.signed(4)?,
            0xd3 => self.signed(8)?,
            0xd9 => Head::Str(self.len(1)?),
            0xda => Head::Str(self.len(2)?),
            0xdb => Head::Str(self.len(4)?),
            0xdc => Head::Array(self.len(2)?),
            0xdd => Head::Array(self.len(4)?),
            0xde => Head::Map(self.len(2)?),
            0xdf => Head::Map(self.len(4)?),
            0xe0..=0xff => Head::Negative(i64::from(marker as i8)),
        })
    }

    fn wrong(field: &'static str, expected: WireType, found: &Head) -> DecodeError {
        DecodeError::WrongType {
            field,
            expected,
            found: found.wire_type(),
        }
    }

    fn map(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        match self.head()? {
            Head::Map(n) => Ok(n),
            other => Err(Self::wrong(field, WireType::Map, &other)),
        }
    }

    fn array(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        match self.head()? {
            Head::Array(n) => Ok(n),
            other => Err(Self::wrong(field, WireType::Array, &other)),
        }
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        match self.head()? {
            Head::Str(n) => {
                std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::InvalidUtf8 { field })
            }
            other => Err(Self::wrong(field, WireType::Str, &other)),
        }
    }

    fn bin(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        match self.head()? {
            Head::Bin(n) => self.take(n),
            other => Err(Self::wrong(field, WireType::Bin, &other)),
        }
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.head()? {
            Head::Bool(b) => Ok(b),
            other => Err(Self::wrong(field, WireType::Bool, &other)),
        }
    }

    fn uint_head(field: &'static str, head: Head) -> Result<u64, DecodeError> {
        match head {
            Head::Uint(v) => Ok(v),
            Head::Negative(v) => Err(DecodeError::OutOfRange {
                field,
                value: i128::from(v),
            }),
            other => Err(Self::wrong(field, WireType::Int, &other)),
        }
    }

    fn uint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let head = self.head()?;
        Self::uint_head(field, head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        let v = self.uint(field)?;
        u8::try_from(v).map_err(|_| DecodeError::OutOfRange {
            field,
            value: i128::from(v),
        })
    }

    fn nil_or_uint(&mut self, field: &'static str) -> Result<Option<u64>, DecodeError> {
        match self.head()? {
            Head::Nil => Ok(None),
            head => Self::uint_head(field, head).map(Some),
        }
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// Stores a key's value, refusing a key seen before in the same map.
fn once<T>(
    slot: &mut Option<T>,
    map: &'static str,
    key: &str,
    value: T,
) -> Result<(), DecodeError> {
    if slot.replace(value).is_some() {
        return Err(DecodeError::DuplicateKey {
            map,
            key: key.into(),
        });
    }
    Ok(())
}

fn required<T>(slot: Option<T>, map: &'static str, key: &'static str) -> Result<T, DecodeError> {
    slot.ok_or(DecodeError::MissingKey { map, key })
}

fn unknown(map: &'static str, key: &str) -> DecodeError {
    DecodeError::UnknownKey {
        map,
        key: key.into(),
    }
}

impl Decode for SignedJob {
    fn decode_msgpack(bytes: &[u8]) -> Result<Self, DecodeError> {
        const M: &str = "SignedJob";
        let mut r = Reader { rest: bytes };
        let (mut v, mut key_id, mut signature, mut body) = (None, None, None, None);
        for _ in 0..r.map(M)? {
            match r.str("SignedJob key")? {
                k @ "v" => once(&mut v, M, k, r.u8("v")?)?,
                k @ "key_id" => once(&mut key_id, M, k, r.str("key_id")?.to_owned())?,
                k @ "signature" => once(&mut signature, M, k, r.bin("signature")?.to_vec())?,
                k @ "body" => once(&mut body, M, k, r.bin("body")?.to_vec())?,
                other => return Err(unknown(M, other)),
            }
        }
        r.finish()?;
        Ok(SignedJob {
            v: required(v, M, "v")?,
            key_id: required(key_id, M, "key_id")?,
            signature: required(signature, M, "signature")?,
            body: required(body, M, "body")?,
        })
    }
}

impl Decode for Job {
    fn decode_msgpack(bytes: &[u8]) -> Result<Self, DecodeError> {
        const M: &str = "Job";
        let mut r = Reader { rest: bytes };
        let (mut job_id, mut tenant, mut model, mut task) = (None, None, None, None);
        let (mut priority, mut created_at_ms, mut deadline_ms, mut meta) = (None, None, None, None);
        for _ in 0..r.map(M)? {
            match r.str("Job key")? {
                k @ "job_id" => once(&mut job_id, M, k, r.str("job_id")?.to_owned())?,
                k @ "tenant" => once(&mut tenant, M, k, r.str("tenant")?.to_owned())?,
                k @ "model" => once(&mut model, M, k, r.str("model")?.to_owned())?,
                k @ "task" => once(&mut task, M, k, read_task(&mut r)?)?,
                k @ "priority" => once(&mut priority, M, k, r.u8("priority")?)?,
                k @ "created_at_ms" => {
                    once(&mut created_at_ms, M, k, r.uint("created_at_ms")?)?;
                }
                k @ "deadline_ms" => {
                    once(&mut deadline_ms, M, k, r.nil_or_uint("deadline_ms")?)?;
                }
                k @ "meta" => once(&mut meta, M, k, read_meta(&mut r)?)?,
                other => return Err(unknown(M, other)),
            }
        }
        r.finish()?;
        Ok(Job {
            job_id: required(job_id, M, "job_id")?,
            tenant: required(tenant, M, "tenant")?,
            model: required(model, M, "model")?,
            task: required(task, M, "task")?,
            priority: priority.unwrap_or(0),
            created_at_ms: required(created_at_ms, M, "created_at_ms")?,
            deadline_ms: deadline_ms.flatten(),
            meta: meta.unwrap_or_default(),
        })
    }
}

fn read_task(r: &mut Reader<'_>) -> Result<Task, DecodeError> {
    const M: &str = "task";
    let (mut kind, mut inputs, mut normalize, mut truncate) = (None, None, None, None);
    for _ in 0..r.map(M)? {
        match r.str("task key")? {
            k @ "kind" => {
                let value = r.str("kind")?;
                // `embed` is the only kind; its keys are the ones below.
                if value != "embed" {
                    return Err(DecodeError::UnknownTaskKind(value.into()));
                }
                once(&mut kind, M, k, ())?;
            }
            k @ "inputs" => {
                let n = r.array("inputs")?;
                // Each input takes at least one byte: a hostile length allocates nothing.
                let mut texts = Vec::with_capacity(n.min(r.rest.len()));
                for _ in 0..n {
                    texts.push(r.str("inputs[]")?.to_owned());
                }
                once(&mut inputs, M, k, texts)?;
            }
            k @ "normalize" => once(&mut normalize, M, k, r.bool("normalize")?)?,
            k @ "truncate" => once(&mut truncate, M, k, r.bool("truncate")?)?,
            other => return Err(unknown(M, other)),
        }
    }
    required(kind, M, "kind")?;
    Ok(Task::Embed {
        inputs: required(inputs, M, "inputs")?,
        normalize: normalize.unwrap_or(true),
        truncate: truncate.unwrap_or(true),
    })
}

fn read_meta(r: &mut Reader<'_>) -> Result<BTreeMap<String, String>, DecodeError> {
    let mut meta = BTreeMap::new();
    for _ in 0..r.map("meta")? {
        let key = r.str("meta key")?;
        let value = r.str("meta value")?;
        if meta.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(DecodeError::DuplicateKey {
                map: "meta",
                key: key.into(),
            });
        }
    }
    Ok(meta)
}
