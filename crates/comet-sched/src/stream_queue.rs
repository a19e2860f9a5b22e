//! Work a proxy enqueued on one stream, each item followed by a marker (a
//! CUDA event on the GPU) that says when the stream got past it. A stream
//! runs its work in order, so its markers are reached in order: looking
//! from the oldest and stopping at the first not reached finds everything
//! done without querying the rest. Markers are handed back for reuse, so
//! a proxy creates its events once. Free of CUDA, tested on CPU.

use std::collections::VecDeque;

/// Something that says whether the stream it was recorded on got past it
/// (`cuEventQuery` for a CUDA event). Never waits.
pub trait Marker {
    type Error;
    fn reached(&self) -> Result<bool, Self::Error>;
}

/// Items of one stream with their markers, oldest first.
#[derive(Debug)]
pub struct StreamQueue<T, M> {
    items: VecDeque<(T, M)>,
}

impl<T, M> Default for StreamQueue<T, M> {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
        }
    }
}

impl<T, M: Marker> StreamQueue<T, M> {
    /// `item` was enqueued on the stream, then `marker` recorded after it.
    pub fn push(&mut self, item: T, marker: M) {
        self.items.push_back((item, marker));
    }

    /// Items still in flight.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Hands every item whose marker the stream reached to `done`, oldest
    /// first, and its marker to `spare`; stops at the first not reached.
    /// Returns how many were done.
    pub fn pop_reached(
        &mut self,
        spare: &mut Vec<M>,
        mut done: impl FnMut(T),
    ) -> Result<usize, M::Error> {
        let mut n = 0;
        while let Some((_, m)) = self.items.front() {
            if !m.reached()? {
                break;
            }
            if let Some((item, m)) = self.items.pop_front() {
                spare.push(m);
                done(item);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Gives up every item without looking (the stream was abandoned),
    /// keeping the markers for reuse.
    pub fn clear(&mut self, spare: &mut Vec<M>) {
        spare.extend(self.items.drain(..).map(|(_, m)| m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A stream that has run `ran` items; marker `i` is reached once it
    /// has run i + 1.
    struct Fake {
        at: usize,
        ran: Rc<Cell<usize>>,
        looks: Rc<Cell<usize>>,
    }

    impl Marker for Fake {
        type Error = String;
        fn reached(&self) -> Result<bool, String> {
            self.looks.set(self.looks.get() + 1);
            if self.at == usize::MAX {
                return Err("broken".into());
            }
            Ok(self.at < self.ran.get())
        }
    }

    #[test]
    fn items_come_out_in_order_as_the_stream_gets_past_them() {
        let (ran, looks) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        let mut q = StreamQueue::default();
        for i in 0..5 {
            q.push(
                i * 10,
                Fake {
                    at: i,
                    ran: Rc::clone(&ran),
                    looks: Rc::clone(&looks),
                },
            );
        }
        let (mut spare, mut got) = (Vec::new(), Vec::new());
        assert_eq!(q.pop_reached(&mut spare, |i| got.push(i)), Ok(0));
        // One look: the oldest is not reached, so nothing later is asked.
        assert_eq!(looks.get(), 1);
        ran.set(3);
        assert_eq!(q.pop_reached(&mut spare, |i| got.push(i)), Ok(3));
        assert_eq!(got, [0, 10, 20]);
        assert_eq!((spare.len(), q.len()), (3, 2));
        ran.set(5);
        assert_eq!(q.pop_reached(&mut spare, |i| got.push(i)), Ok(2));
        assert_eq!(got, [0, 10, 20, 30, 40]);
        assert!(q.is_empty());
        assert_eq!(q.pop_reached(&mut spare, |i| got.push(i)), Ok(0));
        assert_eq!(spare.len(), 5);
    }

    #[test]
    fn an_error_stops_the_look_and_keeps_the_item() {
        let (ran, looks) = (Rc::new(Cell::new(9)), Rc::new(Cell::new(0)));
        let mut q = StreamQueue::default();
        for at in [0, usize::MAX, 1] {
            q.push(
                at,
                Fake {
                    at,
                    ran: Rc::clone(&ran),
                    looks: Rc::clone(&looks),
                },
            );
        }
        let (mut spare, mut got) = (Vec::new(), Vec::new());
        assert_eq!(
            q.pop_reached(&mut spare, |i| got.push(i)),
            Err("broken".into())
        );
        assert_eq!((got, q.len()), (vec![0], 2));
        q.clear(&mut spare);
        assert!(q.is_empty());
        assert_eq!(spare.len(), 3);
    }
}
