//! Walking PostgreSQL arrays in place: header, dimensions, NULL bitmap and
//! elements, as `deconstruct_array` does, without allocating.

use pgrx::pg_sys;

/// sizeof(ArrayType): vl_len_, ndim, dataoffset, elemtype.
const ARRAY_HEADER: usize = 16;
const MAXIMUM_ALIGNOF: usize = 8;

fn align_up(n: usize, to: usize) -> usize {
    (n + to - 1) & !(to - 1)
}

/// A detoasted array (4-byte header, plain).
pub struct ArrayRef {
    base: *const u8,
}

impl ArrayRef {
    /// # Safety
    /// `array` must be a detoasted, plain array value that outlives `self`.
    pub unsafe fn new(array: *const pg_sys::ArrayType) -> ArrayRef {
        ArrayRef { base: array.cast() }
    }

    fn read_i32(&self, at: usize) -> i32 {
        // SAFETY: only called for offsets inside the header and dimension
        // arrays, which every valid array has.
        unsafe { self.base.add(at).cast::<i32>().read_unaligned() }
    }

    fn ndim(&self) -> usize {
        self.read_i32(4).max(0) as usize
    }

    fn data_offset(&self) -> usize {
        self.read_i32(8).max(0) as usize
    }

    pub fn element_type(&self) -> pg_sys::Oid {
        pg_sys::Oid::from(self.read_i32(12) as u32)
    }

    pub fn dims(&self) -> Vec<i32> {
        (0..self.ndim())
            .map(|i| self.read_i32(ARRAY_HEADER + 4 * i))
            .collect()
    }

    pub fn item_count(&self) -> usize {
        if self.ndim() == 0 {
            return 0;
        }
        self.dims().iter().map(|&d| d.max(0) as usize).product()
    }

    /// Iterate the items in storage order: `None` for a NULL element.
    pub fn items(&self, typlen: i16, byval: bool, align: u8) -> Items {
        let ndim = self.ndim();
        let has_nulls = self.data_offset() != 0;
        let data = if has_nulls {
            self.data_offset()
        } else {
            align_up(ARRAY_HEADER + 8 * ndim, MAXIMUM_ALIGNOF)
        };
        // SAFETY: offsets inside the array value, computed as PostgreSQL's
        // ARR_NULLBITMAP / ARR_DATA_PTR macros do.
        unsafe {
            Items {
                bitmap: if has_nulls {
                    self.base.add(ARRAY_HEADER + 8 * ndim)
                } else {
                    std::ptr::null()
                },
                ptr: self.base.add(data),
                index: 0,
                remaining: self.item_count(),
                typlen,
                byval,
                align: match align {
                    b'c' => 1,
                    b's' => 2,
                    b'i' => 4,
                    _ => 8,
                },
            }
        }
    }
}

/// Iterator over array items as datums.
pub struct Items {
    bitmap: *const u8,
    ptr: *const u8,
    index: usize,
    remaining: usize,
    typlen: i16,
    byval: bool,
    align: usize,
}

impl Iterator for Items {
    type Item = Option<pg_sys::Datum>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let index = self.index;
        self.index += 1;
        // SAFETY: the bitmap has a bit per item; element pointers advance
        // exactly as att_addlength_pointer / att_align_nominal do over the
        // array's data area.
        unsafe {
            if !self.bitmap.is_null() && *self.bitmap.add(index / 8) & (1 << (index % 8)) == 0 {
                return Some(None);
            }
            let addr = self.ptr as usize;
            let aligned = align_up(addr, self.align);
            let p = aligned as *const u8;
            let datum = if self.byval {
                match self.typlen {
                    1 => pg_sys::Datum::from(*p as usize),
                    2 => pg_sys::Datum::from(p.cast::<i16>().read() as u16 as usize),
                    4 => pg_sys::Datum::from(p.cast::<i32>().read() as u32 as usize),
                    _ => pg_sys::Datum::from(p.cast::<i64>().read() as usize),
                }
            } else {
                pg_sys::Datum::from(p)
            };
            let len = match self.typlen {
                -1 => pgrx::varlena::varsize_any(p.cast()),
                -2 => std::ffi::CStr::from_ptr(p.cast()).to_bytes().len() + 1,
                n => n as usize,
            };
            self.ptr = p.add(len);
            Some(Some(datum))
        }
    }
}
