//! `pytorch_model.bin` without PyTorch: the zip serialization `torch.save` uses for a state dict
//! (PyTorch ≥ 1.6), written and read back for exactly the tensors an export holds.
//!
//! The file is a ZIP archive (the `zip` crate writes and reads it), every record stored (no
//! compression), each record's data aligned to [`ALIGN`] bytes by a padding extra field with
//! PyTorch's id `FB`, all under one directory `<archive>/` (PyTorch uses the file's stem,
//! `pytorch_model`):
//!
//! - `data.pkl`: a pickle (protocol 2) of a `collections.OrderedDict` name → tensor, each tensor
//!   `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())` with
//!   `storage` the persistent id `('storage', torch.FloatStorage | torch.HalfStorage, key,
//!   'cpu', numel)`: only the globals `torch.load(..., weights_only=True)` allows;
//! - `byteorder`: `little`;
//! - `data/<key>`: the storage, raw little-endian, contiguous row-major (keys `0`, `1`, ... in
//!   the dict's order, one storage per tensor, storage offset 0);
//! - `version`: `3\n`, the file format version `torch.save` writes.
//!
//! Not written: `.format_version` / `.storage_alignment` (recent PyTorch's; without them
//! `torch.load` reads every record through the central directory instead of computing offsets
//! from its own writer's layout) and `.data/serialization_id` (random in PyTorch; the file stays
//! a function of the weights). A record of 4 GiB or more is written with zip64 sizes, as
//! PyTorch's writer does; the archive's directory switches to zip64 by itself when offsets pass
//! 4 GiB. The pickle is this module's own: no crate writes `torch.save`'s. [`read`] parses such
//! a file (and small `torch.save` files of the same kind) back, checking every record's CRC-32.

use std::collections::HashMap;
use std::io::{Cursor, Write};

use anyhow::{Context, Result, bail, ensure};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipArchive, ZipWriter};

/// The file name transformers and MPCFormer look for.
pub const FILE: &str = "pytorch_model.bin";
/// The directory inside the archive (`torch.save` uses the file's stem).
pub const ARCHIVE: &str = "pytorch_model";
/// Alignment of every record's data, as PyTorch's writer aligns it.
pub const ALIGN: usize = 64;

/// The id of PyTorch's padding extra field, `FB`.
const PAD_FIELD: u16 = u16::from_le_bytes(*b"FB");
/// Records this large need zip64 sizes.
const ZIP64_RECORD: usize = u32::MAX as usize;

/// Storage type of a tensor: its element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// `torch.FloatStorage`, f32.
    Float,
    /// `torch.HalfStorage`, f16.
    Half,
}

impl Storage {
    pub fn class(self) -> &'static str {
        match self {
            Storage::Float => "FloatStorage",
            Storage::Half => "HalfStorage",
        }
    }

    pub fn elem_size(self) -> usize {
        match self {
            Storage::Float => 4,
            Storage::Half => 2,
        }
    }

    fn from_class(class: &str) -> Option<Self> {
        [Storage::Float, Storage::Half]
            .into_iter()
            .find(|s| s.class() == class)
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(Storage::Float),
            safetensors::Dtype::F16 => Some(Storage::Half),
            _ => None,
        }
    }

    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            Storage::Float => safetensors::Dtype::F32,
            Storage::Half => safetensors::Dtype::F16,
        }
    }
}

/// One tensor of a state dict: contiguous row-major little-endian `data`.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<'a> {
    pub name: String,
    pub storage: Storage,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

// ---- Writing ----

/// The bytes of `pytorch_model.bin` holding `tensors`, in this order.
pub fn write(tensors: &[Tensor<'_>]) -> Result<Vec<u8>> {
    let mut pkl = Pickle::default();
    pkl.op(0x80).byte(2); // PROTO 2
    pkl.ordered_dict();
    pkl.op(b'('); // MARK
    for (key, t) in tensors.iter().enumerate() {
        let n = numel(&t.shape);
        ensure!(
            t.data.len() == n * t.storage.elem_size(),
            "{}: {} bytes for shape {:?} of {}",
            t.name,
            t.data.len(),
            t.shape,
            t.storage.class()
        );
        pkl.str(&t.name);
        pkl.global("torch._utils", "_rebuild_tensor_v2");
        pkl.op(b'('); // the arguments
        pkl.op(b'('); // the persistent id
        pkl.str("storage");
        pkl.global("torch", t.storage.class());
        pkl.str(&key.to_string());
        pkl.str("cpu");
        pkl.int(n as u64);
        pkl.op(b't'); // TUPLE
        pkl.op(b'Q'); // BINPERSID
        pkl.int(0); // storage_offset
        pkl.tuple(&t.shape);
        pkl.tuple(&row_major_strides(&t.shape));
        pkl.op(0x89); // NEWFALSE: requires_grad
        pkl.ordered_dict(); // backward_hooks
        pkl.op(b't').op(b'R'); // TUPLE, REDUCE
    }
    pkl.op(b'u').op(b'.'); // SETITEMS, STOP

    let keys: Vec<String> = (0..tensors.len()).map(|k| format!("data/{k}")).collect();
    let mut records: Vec<(&str, &[u8])> = vec![("data.pkl", &pkl.0), ("byteorder", b"little")];
    records.extend(
        keys.iter()
            .map(String::as_str)
            .zip(tensors.iter().map(|t| t.data)),
    );
    records.push(("version", b"3\n"));
    archive(&records, false)
}

/// A stored ZIP archive of `records` under [`ARCHIVE`]`/`, each record's data [`ALIGN`]-aligned;
/// zip64 sizes for records that need them, or for all with `force_zip64` (tests).
fn archive(records: &[(&str, &[u8])], force_zip64: bool) -> Result<Vec<u8>> {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    for (name, data) in records {
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            // Fixed, so that the file is a function of the weights.
            .last_modified_time(DateTime::default())
            .large_file(force_zip64 || data.len() >= ZIP64_RECORD)
            .with_alignment_and_header_id(ALIGN as u16, PAD_FIELD);
        let name = format!("{ARCHIVE}/{name}");
        zip.start_file(name.as_str(), options)
            .with_context(|| format!("{FILE}: starting record {name}"))?;
        zip.write_all(data)
            .with_context(|| format!("{FILE}: writing record {name}"))?;
    }
    Ok(zip
        .finish()
        .context("finishing the ZIP archive")?
        .into_inner())
}

/// A protocol-2 pickle, without memo (every reader accepts that).
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) -> &mut Self {
        self.0.push(op);
        self
    }

    fn byte(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }

    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    /// `collections.OrderedDict()`.
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')').op(b'R'); // EMPTY_TUPLE, REDUCE
    }

    fn str(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A non-negative integer as Python's pickler writes it.
    fn int(&mut self, v: u64) {
        if v < 0x100 {
            self.op(b'K').byte(v as u8); // BININT1
        } else if v < 0x1_0000 {
            self.0.push(b'M'); // BININT2
            self.0.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= i32::MAX as u64 {
            self.0.push(b'J'); // BININT
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, with a 0 byte if the top bit is set.
            let mut b = v.to_le_bytes().to_vec();
            while b.len() > 1 && b[b.len() - 1] == 0 && b[b.len() - 2] & 0x80 == 0 {
                b.pop();
            }
            self.op(0x8a).byte(b.len() as u8);
            self.0.extend_from_slice(&b);
        }
    }

    fn tuple(&mut self, items: &[usize]) {
        match items.len() {
            0 => {
                self.op(b')');
            }
            n @ 1..=3 => {
                for &i in items {
                    self.int(i as u64);
                }
                self.op(0x84 + n as u8); // TUPLE1, TUPLE2, TUPLE3
            }
            _ => {
                self.op(b'(');
                for &i in items {
                    self.int(i as u64);
                }
                self.op(b't');
            }
        }
    }
}

// ---- Reading ----

/// One record of the archive: its full name and where its data lies in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub offset: usize,
    pub len: usize,
}

/// The records of a stored ZIP archive, in central-directory order, every CRC-32 checked.
pub fn records(bytes: &[u8]) -> Result<Vec<Record>> {
    let mut zip = ZipArchive::new(Cursor::new(bytes)).context("not a ZIP archive")?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let file = zip
            .by_index_raw(i)
            .with_context(|| format!("ZIP record {i}"))?;
        let name = file.name().unwrap_or_default().to_string();
        ensure!(
            file.compression() == CompressionMethod::Stored
                && file.compressed_size() == file.size(),
            "{name}: compressed ({:?}); PyTorch archives are stored",
            file.compression()
        );
        let offset = file
            .data_start()
            .with_context(|| format!("{name}: no data offset"))?;
        let (offset, len) = (usize::try_from(offset)?, usize::try_from(file.size())?);
        let data = bytes
            .get(offset..offset + len)
            .with_context(|| format!("{name}: data past the end of the file"))?;
        let crc = crc32fast::hash(data);
        ensure!(
            crc == file.crc32(),
            "{name}: CRC-32 {crc:08x} does not match the archive's {:08x}",
            file.crc32()
        );
        out.push(Record { name, offset, len });
    }
    Ok(out)
}

/// A state dict read back: the archive's directory, its records, and the tensors in order.
#[derive(Debug)]
pub struct StateDict<'a> {
    pub archive: String,
    pub records: Vec<Record>,
    pub tensors: Vec<Tensor<'a>>,
}

/// Parses a `pytorch_model.bin` of contiguous float tensors (what [`write`] writes) back.
pub fn read(bytes: &[u8]) -> Result<StateDict<'_>> {
    let records = records(bytes)?;
    let first = records.first().context("empty archive")?;
    let archive = first
        .name
        .split_once('/')
        .map(|(a, _)| a.to_string())
        .with_context(|| format!("record {:?} is not in a directory", first.name))?;
    let by_name: HashMap<&str, &Record> = records.iter().map(|r| (r.name.as_str(), r)).collect();
    let data = |name: &str| -> Result<&[u8]> {
        let r = by_name
            .get(format!("{archive}/{name}").as_str())
            .with_context(|| format!("no record {archive}/{name}"))?;
        Ok(&bytes[r.offset..r.offset + r.len])
    };
    let version = data("version")?;
    ensure!(
        version.trim_ascii() == b"3",
        "version {:?}, expected 3",
        String::from_utf8_lossy(version)
    );
    if let Ok(order) = data("byteorder") {
        ensure!(
            order == b"little",
            "byteorder {:?}",
            String::from_utf8_lossy(order)
        );
    }
    let mut tensors = Vec::new();
    for (name, t) in unpickle(data("data.pkl")?).context("data.pkl")? {
        let storage = data(&format!("data/{}", t.key))?;
        let size = t.storage.elem_size();
        ensure!(
            storage.len() == t.numel * size,
            "{name}: storage {} has {} bytes for {} elements",
            t.key,
            storage.len(),
            t.numel
        );
        let n = numel(&t.shape);
        ensure!(
            t.stride == row_major_strides(&t.shape) && t.offset + n <= t.numel,
            "{name}: not contiguous row-major within its storage (size {:?}, stride {:?}, \
             offset {})",
            t.shape,
            t.stride,
            t.offset
        );
        tensors.push(Tensor {
            name,
            storage: t.storage,
            shape: t.shape,
            data: &storage[t.offset * size..(t.offset + n) * size],
        });
    }
    Ok(StateDict {
        archive,
        records,
        tensors,
    })
}

/// What `data.pkl` says about one tensor.
#[derive(Clone, Debug)]
struct Rebuilt {
    storage: Storage,
    key: String,
    numel: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Clone, Debug)]
enum Val {
    Mark,
    None,
    /// `requires_grad` and other flags: read, never needed.
    Bool,
    Int(i64),
    Str(String),
    Tuple(Vec<Val>),
    Global(String),
    Dict(Vec<(Val, Val)>),
    Storage(Storage, String, usize),
    Tensor(Box<Rebuilt>),
}

fn as_usize(v: &Val) -> Result<usize> {
    match v {
        Val::Int(i) if *i >= 0 => Ok(*i as usize),
        _ => bail!("expected a non-negative integer, got {v:?}"),
    }
}

fn usizes(v: &Val) -> Result<Vec<usize>> {
    match v {
        Val::Tuple(items) => items.iter().map(as_usize).collect(),
        _ => bail!("expected a tuple of integers, got {v:?}"),
    }
}

/// A pickle of an `OrderedDict` of `_rebuild_tensor_v2` tensors (with or without memo, as
/// `torch.save` and [`write`] write it); other objects are refused.
fn unpickle(p: &[u8]) -> Result<Vec<(String, Rebuilt)>> {
    let mut ops = Ops { p, i: 0 };
    let mut m = Unpickler::default();
    loop {
        let op = ops.byte()?;
        if op == b'.' {
            break;
        }
        m.step(op, &mut ops)?;
    }
    let Some(Val::Dict(d)) = m.stack.pop() else {
        bail!("the pickle is not a dict")
    };
    d.into_iter()
        .map(|(k, v)| match (k, v) {
            (Val::Str(k), Val::Tensor(t)) => Ok((k, *t)),
            (k, v) => bail!("entry {k:?}: {v:?} is not a tensor"),
        })
        .collect()
}

/// The opcode stream and its arguments.
struct Ops<'a> {
    p: &'a [u8],
    i: usize,
}

impl<'a> Ops<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self.p.get(self.i..self.i + n).context("truncated pickle")?;
        self.i += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A `\n`-terminated line (GLOBAL's module and name).
    fn line(&mut self) -> Result<String> {
        let rest = &self.p[self.i..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("truncated GLOBAL")?;
        self.i += n + 1;
        Ok(String::from_utf8_lossy(&rest[..n]).to_string())
    }
}

/// The pickle machine: its stack and memo.
#[derive(Default)]
struct Unpickler {
    stack: Vec<Val>,
    memo: HashMap<usize, Val>,
}

impl Unpickler {
    fn pop(&mut self) -> Result<Val> {
        self.stack.pop().context("pickle stack underflow")
    }

    /// The items above the topmost MARK, the MARK removed.
    fn pop_mark(&mut self) -> Result<Vec<Val>> {
        let m = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Val::Mark))
            .context("no MARK")?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items)
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Val>> {
        ensure!(self.stack.len() >= n, "pickle stack underflow");
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    /// One opcode (STOP is the caller's).
    fn step(&mut self, op: u8, ops: &mut Ops) -> Result<()> {
        let v = match op {
            0x80 => {
                ops.byte()?; // PROTO
                return Ok(());
            }
            b'c' => Val::Global(format!("{}.{}", ops.line()?, ops.line()?)),
            b'q' | b'r' => {
                let idx = if op == b'q' {
                    ops.byte()? as usize
                } else {
                    ops.u32()? as usize
                };
                let top = self.stack.last().context("BINPUT on empty stack")?;
                self.memo.insert(idx, top.clone());
                return Ok(());
            }
            b'h' | b'j' => {
                let idx = if op == b'h' {
                    ops.byte()? as usize
                } else {
                    ops.u32()? as usize
                };
                self.memo
                    .get(&idx)
                    .context("BINGET of unknown memo")?
                    .clone()
            }
            b'(' => Val::Mark,
            b')' => Val::Tuple(vec![]),
            b't' => Val::Tuple(self.pop_mark()?),
            0x85..=0x87 => Val::Tuple(self.pop_n((op - 0x84) as usize)?),
            b'N' => Val::None,
            0x88 | 0x89 => Val::Bool,
            b'K' => Val::Int(ops.byte()? as i64),
            b'M' => Val::Int(ops.u16()? as i64),
            b'J' => Val::Int(ops.u32()? as i32 as i64),
            0x8a => Val::Int(long1(ops)?),
            b'X' => {
                let n = ops.u32()? as usize;
                let s = std::str::from_utf8(ops.take(n)?).context("BINUNICODE is not UTF-8")?;
                Val::Str(s.to_string())
            }
            b'}' => Val::Dict(vec![]),
            b'Q' => {
                let pid = self.pop()?;
                persistent_load(pid)?
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                reduce(f, args)?
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    self.pop_n(2)?
                } else {
                    self.pop_mark()?
                };
                return self.set_items(items);
            }
            _ => bail!("pickle opcode 0x{op:02x} at {} is not supported", ops.i - 1),
        };
        self.stack.push(v);
        Ok(())
    }

    /// SETITEM(S): key, value pairs into the dict below them.
    fn set_items(&mut self, items: Vec<Val>) -> Result<()> {
        ensure!(
            items.len().is_multiple_of(2),
            "SETITEMS with an odd number of items"
        );
        let Some(Val::Dict(d)) = self.stack.last_mut() else {
            bail!("SETITEMS without a dict")
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }
}

/// LONG1: little-endian two's complement of up to 8 bytes.
fn long1(ops: &mut Ops) -> Result<i64> {
    let n = ops.byte()? as usize;
    let b = ops.take(n)?;
    ensure!(n <= 8, "LONG1 of {n} bytes");
    let mut buf = if b.last().is_some_and(|x| x & 0x80 != 0) {
        [0xff; 8]
    } else {
        [0; 8]
    };
    buf[..n].copy_from_slice(b);
    Ok(i64::from_le_bytes(buf))
}

/// BINPERSID: `('storage', torch.<Type>Storage, key, location, numel)`.
fn persistent_load(pid: Val) -> Result<Val> {
    let Val::Tuple(t) = &pid else {
        bail!("persistent id {pid:?}")
    };
    match t.as_slice() {
        [Val::Str(s), Val::Global(g), Val::Str(key), Val::Str(_), n] if s == "storage" => {
            let class = g.strip_prefix("torch.").unwrap_or(g);
            let st = Storage::from_class(class)
                .with_context(|| format!("storage type {g} (f32/f16 only)"))?;
            Ok(Val::Storage(st, key.clone(), as_usize(n)?))
        }
        _ => bail!("persistent id {pid:?}"),
    }
}

/// REDUCE, for the two callables a state dict uses.
fn reduce(f: Val, args: Val) -> Result<Val> {
    let (Val::Global(f), Val::Tuple(args)) = (&f, &args) else {
        bail!("REDUCE of {f:?} with {args:?}")
    };
    match (f.as_str(), args.as_slice()) {
        ("collections.OrderedDict", []) => Ok(Val::Dict(vec![])),
        (
            "torch._utils._rebuild_tensor_v2",
            [Val::Storage(st, key, n), off, size, stride, _, _, ..],
        ) => Ok(Val::Tensor(Box::new(Rebuilt {
            storage: *st,
            key: key.clone(),
            numel: *n,
            offset: as_usize(off)?,
            shape: usizes(size)?,
            stride: usizes(stride)?,
        }))),
        _ => bail!("REDUCE of {f} with {args:?} is not a state dict's"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes in the local header at `at`: 0xffffffff each when they live in a zip64 field.
    fn local_sizes(bytes: &[u8], at: usize) -> [u32; 2] {
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        assert_eq!(u32_at(at), 0x0403_4b50, "a local header at {at}");
        [u32_at(at + 18), u32_at(at + 22)]
    }

    #[test]
    fn zip64_records_read_back() {
        let big: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let recs: [(&str, &[u8]); 3] = [("check", b"123456789"), ("big", &big), ("empty", b"")];
        for force_zip64 in [false, true] {
            let bytes = archive(&recs, force_zip64).unwrap();
            let sizes = local_sizes(&bytes, 0);
            if force_zip64 {
                assert_eq!(sizes, [u32::MAX; 2], "sizes in the zip64 field");
            } else {
                assert_eq!(sizes, [9, 9]);
            }
            let read = records(&bytes).unwrap();
            assert_eq!(read.len(), 3);
            for (r, (name, data)) in read.iter().zip(recs) {
                assert_eq!(r.name, format!("{ARCHIVE}/{name}"));
                assert_eq!(r.offset % ALIGN, 0, "{r:?}");
                assert_eq!(&bytes[r.offset..r.offset + r.len], data, "{name}");
            }
            // The CRC the archive records is the standard CRC-32 (its check value).
            let mut zip = ZipArchive::new(Cursor::new(&bytes)).unwrap();
            assert_eq!(zip.by_index_raw(0).unwrap().crc32(), 0xCBF4_3926);
            // A flipped data byte fails its CRC.
            let mut bad = bytes.clone();
            bad[read[1].offset + 500] ^= 1;
            let e = format!("{:#}", records(&bad).unwrap_err());
            assert!(e.contains("big: CRC-32"), "{e}");
        }
    }

    #[test]
    fn round_trip_with_every_shape_kind() {
        let a: Vec<u8> = (0..2 * 3 * 4 * 5 * 4).map(|i| i as u8).collect();
        let b: Vec<u8> = vec![1, 2, 3, 4];
        let c: Vec<u8> = (0..6).collect();
        let tensors = vec![
            Tensor {
                name: "four.dims".into(),
                storage: Storage::Float,
                shape: vec![2, 3, 4, 5],
                data: &a,
            },
            Tensor {
                name: "scalar".into(),
                storage: Storage::Float,
                shape: vec![],
                data: &b,
            },
            Tensor {
                name: "half".into(),
                storage: Storage::Half,
                shape: vec![3],
                data: &c,
            },
        ];
        let bytes = write(&tensors).unwrap();
        let sd = read(&bytes).unwrap();
        assert_eq!(sd.archive, ARCHIVE);
        assert_eq!(sd.tensors, tensors);
        for r in &sd.records {
            assert_eq!(r.offset % ALIGN, 0, "{r:?}");
        }
        // Deterministic: the same tensors, the same bytes.
        assert_eq!(write(&tensors).unwrap(), bytes);
        // A flipped data byte fails its CRC.
        let mut bad = bytes.clone();
        bad[sd.records[2].offset] ^= 1;
        assert!(format!("{:#}", read(&bad).unwrap_err()).contains("CRC"));
        // Wrong sizes are refused on write.
        let short = [Tensor {
            data: &b[..2],
            ..tensors[1].clone()
        }];
        assert!(write(&short).is_err());
    }

    #[test]
    fn integers_as_pythons_pickler_writes_them() {
        let enc = |v: u64| {
            let mut p = Pickle::default();
            p.int(v);
            p.0
        };
        assert_eq!(enc(7), [b'K', 7]);
        assert_eq!(enc(30522), [b'M', 0x3a, 0x77]);
        assert_eq!(enc(23_440_896), [b'J', 0x00, 0xae, 0x65, 0x01]);
        assert_eq!(enc(1 << 31), [0x8a, 5, 0, 0, 0, 0x80, 0]);
        assert_eq!(enc(1 << 32), [0x8a, 5, 0, 0, 0, 0, 1]);
    }
}
