/* The C accelerator of dhruva.persistent: a drop-in for dhruva._persistent_py.
 *
 * It provides the same names (PersistentBase, ConnectionBase, GhostBase, the
 * state constants GHOST/SAVED/UNSAVED, _getattribute/_setattribute/
 * _delattribute and the ghost class functions) with the same behaviour,
 * faster.
 *
 * Design (see dhruva._persistent_py for the whole of it): by default, as in
 * Durus, PersistentBase's attribute hook loads a ghost and notes the first
 * access in a transaction; a loaded object already read in this transaction
 * costs one status test and one comparison (serial_source) before the generic
 * lookup.  A class made with fast_reads=True keeps instead the generic lookup
 * (so the interpreter specializes reads of a loaded object as it does for a
 * plain one); its ghosts, and its loaded objects not yet read in the current
 * transaction, have the class's *ghost class*, a subclass with the same layout
 * whose only change is the attribute hook of GhostBase: the first access
 * loads the state if needed, tells the connection (note_access) and puts the
 * object's own class back.  The connection hands the fast_reads objects read
 * in a transaction to _untouch_all() when it ends.  A write checks the name
 * prefix, and skips the call to _p_note_change() when the object is already
 * unsaved and its class keeps the _p_note_change() defined here.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#ifndef Py_T_INT
#define Py_T_INT T_INT
#define Py_T_LONGLONG T_LONGLONG
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_READONLY READONLY
#endif

#define STATUS_GHOST -1
#define STATUS_SAVED 0
#define STATUS_UNSAVED 1

static PyObject *str_p_load_state;
static PyObject *str_p_note_change;
static PyObject *str_p_set_status_unsaved;
static PyObject *str_p_connection;
static PyObject *str_note_access;
static PyObject *str_note_change;
static PyObject *str_transaction_serial;
static PyObject *str_class;
static PyObject *str_repr;
static PyObject *str_setstate;
static PyObject *str_ghost_class_key;
static PyObject *str_make_ghost_class;
static PyObject *str_p_fast_reads;
static PyObject *str_fast_reads;
static PyObject *str_init_subclass;
static PyObject *str_getattribute;

/* dhruva._persistent_py.make_ghost_class, imported on first use. */
static PyObject *make_ghost_class_function;

/* The _p_note_change method descriptor of PersistentBase, compared against
 * what a class resolves the name to. */
static PyObject *default_note_change;

static PyObject *empty_tuple;

/* --- ConnectionBase ------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    long long transaction_serial;
} ConnectionBaseObject;

static PyObject *
connection_base_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    ConnectionBaseObject *self = (ConnectionBaseObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->transaction_serial = 1;
    }
    return (PyObject *)self;
}

static void
connection_base_dealloc(PyObject *self)
{
    Py_TYPE(self)->tp_free(self);
}

static PyMemberDef connection_base_members[] = {
    {"transaction_serial", Py_T_LONGLONG,
     offsetof(ConnectionBaseObject, transaction_serial), 0,
     "Counts commits and aborts; objects stamp it on access."},
    {NULL},
};

static PyTypeObject ConnectionBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dhruva._persistent.ConnectionBase",
    .tp_basicsize = sizeof(ConnectionBaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The part of a Connection that persistent objects touch on "
              "every access.",
    .tp_new = connection_base_new,
    .tp_dealloc = connection_base_dealloc,
    .tp_members = connection_base_members,
};

/* --- PersistentBase ------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int status;
    long long serial;
    PyObject *connection;
    PyObject *oid;
    /* The serial an attribute read must match to skip the hook: the
     * connection's, our own when the connection is None, NULL when it must be
     * looked up (not a ConnectionBase, or unset). */
    long long *serial_source;
} PersistentBaseObject;

static void
set_serial_source(PersistentBaseObject *self)
{
    PyObject *connection = self->connection;
    if (connection == Py_None) {
        self->serial_source = &self->serial;
    }
    else if (connection != NULL &&
             PyObject_TypeCheck(connection, &ConnectionBase_Type)) {
        self->serial_source =
            &((ConnectionBaseObject *)connection)->transaction_serial;
    }
    else {
        self->serial_source = NULL;
    }
}

static PyTypeObject PersistentBase_Type;
static PyTypeObject GhostBase_Type;

static PyObject *
persistent_base_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    /* object.__new__ allocates and, for a class with an instance dict, sets
     * up the compact shared-key layout that plain objects get. */
    PersistentBaseObject *self = (PersistentBaseObject *)PyBaseObject_Type.tp_new(
        type, empty_tuple, NULL);
    if (self == NULL) {
        return NULL;
    }
    self->status = STATUS_UNSAVED;
    self->serial = 0;
    self->connection = Py_NewRef(Py_None);
    self->oid = Py_NewRef(Py_None);
    self->serial_source = &self->serial;
    return (PyObject *)self;
}

static int
persistent_base_traverse(PersistentBaseObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->connection);
    Py_VISIT(self->oid);
    return 0;
}

static int
persistent_base_clear(PersistentBaseObject *self)
{
    self->serial_source = NULL;
    Py_CLEAR(self->connection);
    Py_CLEAR(self->oid);
    return 0;
}

static void
persistent_base_dealloc(PersistentBaseObject *self)
{
    PyObject_GC_UnTrack(self);
    persistent_base_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* True when name[:3] == "_p_". */
static inline int
is_p_name(PyObject *name)
{
    if (!PyUnicode_Check(name) || PyUnicode_GET_LENGTH(name) < 3) {
        return 0;
    }
    int kind = PyUnicode_KIND(name);
    const void *data = PyUnicode_DATA(name);
    return (PyUnicode_READ(kind, data, 0) == '_' &&
            PyUnicode_READ(kind, data, 1) == 'p' &&
            PyUnicode_READ(kind, data, 2) == '_');
}

static inline int
same_name(PyObject *name, PyObject *interned)
{
    return name == interned || PyUnicode_Compare(name, interned) == 0;
}

static inline int
is_ghost_type(PyTypeObject *type)
{
    return type != &GhostBase_Type && PyType_IsSubtype(type, &GhostBase_Type);
}

/* --- class switching ----------------------------------------------------- */

/* Give self the class `to` (its class's ghost class, or back its own class):
 * the two have the same layout. */
static int
set_class(PyObject *self, PyTypeObject *to)
{
#if PY_VERSION_HEX < 0x030D0000
    PyTypeObject *from = Py_TYPE(self);
    if (from->tp_flags & Py_TPFLAGS_MANAGED_DICT) {
        /* Inline attribute values are laid out by the class's shared keys:
         * move them into a dict first (as assigning __class__ does), and make
         * that dict a plain one, which the interpreter's specialized reads
         * handle (a dict sharing the class's keys keeps them on the slow
         * path). */
        PyObject **dictptr = _PyObject_GetDictPtr(self);
        if (dictptr == NULL) {
            return PyErr_Occurred() ? -1 : (PyErr_NoMemory(), -1);
        }
        PyObject *dict = *dictptr;
        if (dict != NULL && PyDict_CheckExact(dict) &&
            ((PyDictObject *)dict)->ma_values != NULL) {
            PyObject *plain = PyDict_New();
            if (plain == NULL || PyDict_Update(plain, dict) < 0) {
                Py_XDECREF(plain);
                return -1;
            }
            Py_SETREF(*dictptr, plain);
        }
    }
    Py_INCREF(to);
    Py_SET_TYPE(self, to);
    Py_DECREF(from);
    return 0;
#else
    return PyObject_GenericSetAttr(self, str_class, (PyObject *)to);
#endif
}

/* 1 when the class asked for fast_reads (its _p_fast_reads is true), 0 when
 * not, -1 with an exception set. */
static int
is_fast_reads_type(PyTypeObject *type)
{
    PyObject *flag = _PyType_Lookup(type, str_p_fast_reads);
    if (flag == NULL || flag == Py_False) {
        return 0;
    }
    if (flag == Py_True) {
        return 1;
    }
    return PyObject_IsTrue(flag);
}

/* The ghost class of the persistent class `type` (borrowed reference): the
 * class itself for a default (not fast_reads) class. */
static PyTypeObject *
ghost_class_of(PyTypeObject *type)
{
    if (is_ghost_type(type)) {
        return type;
    }
    PyObject *ghost = NULL;
    if (type->tp_dict != NULL) {
        ghost = PyDict_GetItemWithError(type->tp_dict, str_ghost_class_key);
        if (ghost == NULL && PyErr_Occurred()) {
            return NULL;
        }
    }
    if (ghost != NULL && PyType_Check(ghost)) {
        return (PyTypeObject *)ghost;
    }
    if (!PyType_IsSubtype(type, &PersistentBase_Type)) {
        PyErr_Format(PyExc_TypeError, "%s is not a persistent class",
                     type->tp_name);
        return NULL;
    }
    int fast = is_fast_reads_type(type);
    if (fast <= 0) {
        /* A default class: its ghosts have the class itself. */
        return fast < 0 ? NULL : type;
    }
    if (make_ghost_class_function == NULL) {
        PyObject *module = PyImport_ImportModule("dhruva._persistent_py");
        if (module == NULL) {
            return NULL;
        }
        make_ghost_class_function = PyObject_GetAttr(module, str_make_ghost_class);
        Py_DECREF(module);
        if (make_ghost_class_function == NULL) {
            return NULL;
        }
    }
    PyObject *made = PyObject_CallFunctionObjArgs(
        make_ghost_class_function, (PyObject *)type, (PyObject *)&GhostBase_Type,
        NULL);
    if (made == NULL) {
        return NULL;
    }
    /* The class keeps it in its __dict__. */
    Py_DECREF(made);
    if (!PyType_Check(made) || !is_ghost_type((PyTypeObject *)made)) {
        PyErr_SetString(PyExc_TypeError, "make_ghost_class() made no ghost class");
        return NULL;
    }
    return (PyTypeObject *)made;
}

/* Load a ghost, note the access, and give the object its own class back. */
/* Call connection.note_access(self) when _p_serial differs from the
 * connection's transaction serial.  Returns -1 with an exception set. */
static int
note_access(PersistentBaseObject *self)
{
    PyObject *connection = self->connection;
    if (connection == NULL) {
        PyErr_SetObject(PyExc_AttributeError, str_p_connection);
        return -1;
    }
    if (connection == Py_None) {
        return 0;
    }
    int differs;
    Py_INCREF(connection);
    if (self->serial_source != NULL) {
        differs = *self->serial_source != self->serial;
    }
    else {
        PyObject *current = PyObject_GetAttr(connection, str_transaction_serial);
        PyObject *serial = PyLong_FromLongLong(self->serial);
        differs = (current == NULL || serial == NULL)
                      ? -1
                      : PyObject_RichCompareBool(serial, current, Py_NE);
        Py_XDECREF(current);
        Py_XDECREF(serial);
    }
    if (differs > 0) {
        PyObject *result =
            PyObject_CallMethodOneArg(connection, str_note_access, (PyObject *)self);
        differs = result == NULL ? -1 : 0;
        Py_XDECREF(result);
    }
    Py_DECREF(connection);
    return differs < 0 ? -1 : 0;
}

static int
touch(PersistentBaseObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    if (self->status == STATUS_GHOST) {
        PyObject *result =
            PyObject_CallMethodNoArgs((PyObject *)self, str_p_load_state);
        if (result == NULL) {
            return -1;
        }
        Py_DECREF(result);
    }
    if (note_access(self) < 0) {
        return -1;
    }
    if (Py_TYPE(self) == type && is_ghost_type(type)) {
        return set_class((PyObject *)self, type->tp_base);
    }
    return 0;
}

/* --- GhostBase: the hook of ghost classes -------------------------------- */

static PyObject *
ghost_getattro(PyObject *self, PyObject *name)
{
    if (!PyUnicode_Check(name) || is_p_name(name) || same_name(name, str_repr) ||
        same_name(name, str_setstate)) {
        return PyObject_GenericGetAttr(self, name);
    }
    PyTypeObject *type = Py_TYPE(self);
    if (same_name(name, str_class) && is_ghost_type(type)) {
        return Py_NewRef((PyObject *)type->tp_base);
    }
    if (touch((PersistentBaseObject *)self) < 0) {
        return NULL;
    }
    if (Py_TYPE(self) == type) {
        /* Not a ghost class after all (GhostBase itself). */
        return PyObject_GenericGetAttr(self, name);
    }
    return PyObject_GetAttr(self, name);
}

/* --- PersistentBase attribute hooks ------------------------------------- */

/* True when reading this name must load a ghost and note the access. */
static int
is_hooked_name(PyObject *name)
{
    if (!PyUnicode_Check(name) || is_p_name(name)) {
        return 0;
    }
    return !(same_name(name, str_class) || same_name(name, str_repr) ||
             same_name(name, str_setstate));
}

static PyObject *
persistent_base_getattro_slow(PersistentBaseObject *self, PyObject *name)
{
    if (is_hooked_name(name)) {
        if (self->status == STATUS_GHOST) {
            PyObject *result =
                PyObject_CallMethodNoArgs((PyObject *)self, str_p_load_state);
            if (result == NULL) {
                return NULL;
            }
            Py_DECREF(result);
        }
        if (note_access(self) < 0) {
            return NULL;
        }
    }
    return PyObject_GenericGetAttr((PyObject *)self, name);
}

/* The hook of default (not fast_reads) classes, as in Durus: a loaded object
 * already read in this transaction costs one status test and one comparison
 * before the generic lookup. */
static PyObject *
persistent_base_getattro(PersistentBaseObject *self, PyObject *name)
{
    long long *source = self->serial_source;
    if (self->status != STATUS_GHOST && source != NULL && *source == self->serial) {
        return PyObject_GenericGetAttr((PyObject *)self, name);
    }
    return persistent_base_getattro_slow(self, name);
}

/* Handles both setting (value != NULL) and deleting (value == NULL). */
static int
persistent_base_setattro(PersistentBaseObject *self, PyObject *name,
                         PyObject *value)
{
    if (PyUnicode_Check(name) && !is_p_name(name)) {
        /* The default _p_note_change() does nothing on an unsaved object. */
        if (self->status != STATUS_UNSAVED ||
            _PyType_Lookup(Py_TYPE(self), str_p_note_change) !=
                default_note_change) {
            PyObject *result =
                PyObject_CallMethodNoArgs((PyObject *)self, str_p_note_change);
            if (result == NULL) {
                return -1;
            }
            Py_DECREF(result);
        }
    }
    return PyObject_GenericSetAttr((PyObject *)self, name, value);
}

static PyObject *
persistent_base_note_change(PersistentBaseObject *self, PyObject *unused)
{
    if (is_ghost_type(Py_TYPE(self)) && touch(self) < 0) {
        return NULL;
    }
    if (self->status != STATUS_UNSAVED) {
        PyObject *result =
            PyObject_CallMethodNoArgs((PyObject *)self, str_p_set_status_unsaved);
        if (result == NULL) {
            return NULL;
        }
        Py_DECREF(result);
        PyObject *connection = self->connection;
        if (connection == NULL) {
            PyErr_SetObject(PyExc_AttributeError, str_p_connection);
            return NULL;
        }
        if (connection != Py_None) {
            Py_INCREF(connection);
            result = PyObject_CallMethodOneArg(connection, str_note_change,
                                               (PyObject *)self);
            Py_DECREF(connection);
            if (result == NULL) {
                return NULL;
            }
            Py_DECREF(result);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
persistent_base_get_connection(PersistentBaseObject *self, void *closure)
{
    if (self->connection == NULL) {
        PyErr_SetObject(PyExc_AttributeError, str_p_connection);
        return NULL;
    }
    return Py_NewRef(self->connection);
}

static int
persistent_base_set_connection(PersistentBaseObject *self, PyObject *value,
                               void *closure)
{
    if (value == NULL && self->connection == NULL) {
        PyErr_SetObject(PyExc_AttributeError, str_p_connection);
        return -1;
    }
    Py_XSETREF(self->connection, Py_XNewRef(value));
    set_serial_source(self);
    return 0;
}

/* dhruva._persistent_py.init_subclass, imported on first use. */
static PyObject *init_subclass_function;

/* class C(PersistentBase, fast_reads=...): the mode is set by
 * dhruva._persistent_py.init_subclass, shared by both implementations. */
static PyObject *
persistent_base_init_subclass(PyObject *cls, PyObject *args, PyObject *kwds)
{
    PyObject *fast_reads = Py_None;
    if (PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError,
                        "__init_subclass__() takes no positional arguments");
        return NULL;
    }
    if (kwds != NULL) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(kwds, &pos, &key, &value)) {
            if (!same_name(key, str_fast_reads)) {
                PyErr_Format(PyExc_TypeError,
                             "%s.__init_subclass__() takes no keyword argument "
                             "%R (persistent classes take only fast_reads=)",
                             ((PyTypeObject *)cls)->tp_name, key);
                return NULL;
            }
            fast_reads = value;
        }
    }
    if (init_subclass_function == NULL) {
        PyObject *module = PyImport_ImportModule("dhruva._persistent_py");
        if (module == NULL) {
            return NULL;
        }
        init_subclass_function = PyObject_GetAttr(module, str_init_subclass);
        Py_DECREF(module);
        if (init_subclass_function == NULL) {
            return NULL;
        }
    }
    PyObject *hook = PyDict_GetItemWithError(PersistentBase_Type.tp_dict,
                                             str_getattribute);
    if (hook == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_AttributeError, str_getattribute);
        }
        return NULL;
    }
    return PyObject_CallFunctionObjArgs(init_subclass_function, cls, fast_reads,
                                        hook, NULL);
}

static PyMethodDef persistent_base_methods[] = {
    {"__init_subclass__", (PyCFunction)(void (*)(void))persistent_base_init_subclass,
     METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "Set the class's read mode: fast_reads=True keeps the generic attribute "
     "lookup (see dhruva.persistent)."},
    {"_p_note_change", (PyCFunction)persistent_base_note_change, METH_NOARGS,
     "Mark this object changed, so the next commit stores it."},
    {NULL},
};

static PyMemberDef persistent_base_members[] = {
    {"_p_status", Py_T_INT, offsetof(PersistentBaseObject, status), 0,
     "GHOST, SAVED or UNSAVED."},
    {"_p_serial", Py_T_LONGLONG, offsetof(PersistentBaseObject, serial), 0,
     "The connection's transaction serial at the last first access."},
    {"_p_oid", Py_T_OBJECT_EX, offsetof(PersistentBaseObject, oid), 0,
     "The object id, or None before the first commit."},
    {NULL},
};

static PyGetSetDef persistent_base_getset[] = {
    {"_p_connection", (getter)persistent_base_get_connection,
     (setter)persistent_base_set_connection,
     "The connection that loaded or stored this object, or None.", NULL},
    {NULL},
};

static PyTypeObject PersistentBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dhruva._persistent.PersistentBase",
    .tp_basicsize = sizeof(PersistentBaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Slots and the change-tracking hook shared by every persistent "
              "object.",
    .tp_new = persistent_base_new,
    .tp_dealloc = (destructor)persistent_base_dealloc,
    .tp_traverse = (traverseproc)persistent_base_traverse,
    .tp_clear = (inquiry)persistent_base_clear,
    .tp_getattro = (getattrofunc)persistent_base_getattro,
    .tp_setattro = (setattrofunc)persistent_base_setattro,
    .tp_methods = persistent_base_methods,
    .tp_members = persistent_base_members,
    .tp_getset = persistent_base_getset,
};

static PyTypeObject GhostBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dhruva._persistent.GhostBase",
    .tp_basicsize = sizeof(PersistentBaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The hook every ghost class adds: the first access touches the "
              "object.",
    .tp_getattro = ghost_getattro,
    .tp_traverse = (traverseproc)persistent_base_traverse,
    .tp_clear = (inquiry)persistent_base_clear,
};

/* --- the persistent-id filter ------------------------------------------- */

/* Calls func(obj) for persistent objects and answers None for the others
 * without a Python call: a pickler asks its persistent_id for every object. */
typedef struct {
    PyObject_HEAD
    PyObject *func;
    vectorcallfunc vectorcall;
} IdFilterObject;

static PyObject *
id_filter_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                     PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a persistent-id filter takes one object");
        return NULL;
    }
    PyObject *obj = args[0];
    if (!PyObject_TypeCheck(obj, &PersistentBase_Type)) {
        Py_RETURN_NONE;
    }
    return PyObject_CallOneArg(((IdFilterObject *)self)->func, obj);
}

static int
id_filter_traverse(IdFilterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->func);
    return 0;
}

static int
id_filter_clear(IdFilterObject *self)
{
    Py_CLEAR(self->func);
    return 0;
}

static void
id_filter_dealloc(IdFilterObject *self)
{
    PyObject_GC_UnTrack(self);
    id_filter_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject IdFilter_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dhruva._persistent.PersistentIdFilter",
    .tp_basicsize = sizeof(IdFilterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "func(obj) for persistent objects, None for the others.",
    .tp_vectorcall_offset = offsetof(IdFilterObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = (destructor)id_filter_dealloc,
    .tp_traverse = (traverseproc)id_filter_traverse,
    .tp_clear = (inquiry)id_filter_clear,
};

static PyObject *
module_persistent_id_filter(PyObject *module, PyObject *func)
{
    IdFilterObject *filter = PyObject_GC_New(IdFilterObject, &IdFilter_Type);
    if (filter == NULL) {
        return NULL;
    }
    filter->func = Py_NewRef(func);
    filter->vectorcall = id_filter_vectorcall;
    PyObject_GC_Track(filter);
    return (PyObject *)filter;
}

/* --- BTree insertion ----------------------------------------------------- */

static PyObject *str_items;
static PyObject *str_nodes;
static PyObject *str_count;
static PyObject *str_minimum_degree;
static PyObject *long_one;

/* 2 * type(node).minimum_degree - 1, the most items a node may hold. */
static Py_ssize_t
node_limit(PyObject *node)
{
    PyObject *degree = PyObject_GetAttr((PyObject *)Py_TYPE(node), str_minimum_degree);
    if (degree == NULL) {
        return -1;
    }
    Py_ssize_t value = PyLong_AsSsize_t(degree);
    Py_DECREF(degree);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    return 2 * value - 1;
}

/* item[0] of a node item (a tuple, as stored; any sequence is accepted). */
static PyObject *
item_key(PyObject *item)
{
    if (PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) > 0) {
        return Py_NewRef(PyTuple_GET_ITEM(item, 0));
    }
    return PySequence_GetItem(item, 0);
}

static PyObject *
get_items(PyObject *node)
{
    PyObject *items = PyObject_GetAttr(node, str_items);
    if (items != NULL && !PyList_Check(items)) {
        PyErr_Format(PyExc_TypeError, "the items of %R are not a list", node);
        Py_CLEAR(items);
    }
    return items;
}

static int
note_node_change(PyObject *node)
{
    PyObject *result;
    if (PyObject_TypeCheck(node, &PersistentBase_Type)) {
        result = persistent_base_note_change((PersistentBaseObject *)node, NULL);
    }
    else {
        result = PyObject_CallMethodNoArgs(node, str_p_note_change);
    }
    Py_XDECREF(result);
    return result == NULL ? -1 : 0;
}

/* The first position in items whose key is not below key, or -1. */
static Py_ssize_t
bisect_items(PyObject *items, PyObject *key)
{
    Py_ssize_t low = 0, high = PyList_GET_SIZE(items);
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        PyObject *item = PyList_GET_ITEM(items, middle);
        Py_INCREF(item);
        PyObject *middle_key = item_key(item);
        Py_DECREF(item);
        if (middle_key == NULL) {
            return -1;
        }
        int below = PyObject_RichCompareBool(middle_key, key, Py_LT);
        Py_DECREF(middle_key);
        if (below < 0) {
            return -1;
        }
        if (below) {
            low = middle + 1;
        }
        else {
            high = middle;
        }
        if (high > PyList_GET_SIZE(items)) {
            PyErr_SetString(PyExc_RuntimeError, "node items changed while comparing");
            return -1;
        }
    }
    return low;
}

/* 1 when items[position] has key (and replaces it with item), 0 when not. */
static int
replace_equal(PyObject *items, Py_ssize_t position, PyObject *key, PyObject *item)
{
    if (position >= PyList_GET_SIZE(items)) {
        return 0;
    }
    PyObject *found = item_key(PyList_GET_ITEM(items, position));
    if (found == NULL) {
        return -1;
    }
    int equal = PyObject_RichCompareBool(found, key, Py_EQ);
    Py_DECREF(found);
    if (equal > 0) {
        if (PyList_SetItem(items, position, Py_NewRef(item)) < 0) {
            return -1;
        }
    }
    return equal;
}

/* _btree_add(root, key, item, split_child): the descent of BTree.add (see
 * dhruva.btree).  Returns False, having changed nothing, when the root is
 * full; True when done. */
static PyObject *
module_btree_add(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "_btree_add() takes 4 arguments");
        return NULL;
    }
    PyObject *key = args[1], *item = args[2], *split_child = args[3];
    PyObject *path = PyList_New(0);
    PyObject *node = Py_NewRef(args[0]);
    PyObject *items = NULL, *nodes = NULL, *child = NULL, *child_items = NULL;
    PyTypeObject *limit_type = NULL;
    Py_ssize_t limit = 0;
    int done = 0;
    if (path == NULL || (items = get_items(node)) == NULL) {
        goto error;
    }
    if ((limit = node_limit(node)) < 0) {
        goto error;
    }
    limit_type = Py_TYPE(node);
    if (PyList_GET_SIZE(items) >= limit) {
        /* A full root: the caller splits it first. */
        Py_DECREF(items);
        Py_DECREF(node);
        Py_DECREF(path);
        Py_RETURN_FALSE;
    }
    while (1) {
        Py_ssize_t position = bisect_items(items, key);
        if (position < 0) {
            goto error;
        }
        int equal = replace_equal(items, position, key, item);
        if (equal < 0) {
            goto error;
        }
        if (equal) {
            if (note_node_change(node) < 0) {
                goto error;
            }
            done = 1; /* replaced: no count changes */
            break;
        }
        nodes = PyObject_GetAttr(node, str_nodes);
        if (nodes == NULL) {
            goto error;
        }
        if (nodes == Py_None) {
            if (PyList_Insert(items, position, item) < 0 || note_node_change(node) < 0) {
                goto error;
            }
            PyObject *count = PyLong_FromSsize_t(PyList_GET_SIZE(items));
            if (count == NULL) {
                goto error;
            }
            int failed = PyObject_GenericSetAttr(node, str_count, count);
            Py_DECREF(count);
            if (failed < 0) {
                goto error;
            }
            break;
        }
        if (!PyList_Check(nodes) || position >= PyList_GET_SIZE(nodes)) {
            PyErr_Format(PyExc_TypeError, "the child nodes of %R do not match its items",
                         node);
            goto error;
        }
        child = Py_NewRef(PyList_GET_ITEM(nodes, position));
        if ((child_items = get_items(child)) == NULL) {
            goto error;
        }
        if (Py_TYPE(child) != limit_type) {
            if ((limit = node_limit(child)) < 0) {
                goto error;
            }
            limit_type = Py_TYPE(child);
        }
        if (PyList_GET_SIZE(child_items) >= limit) {
            PyObject *position_object = PyLong_FromSsize_t(position);
            if (position_object == NULL) {
                goto error;
            }
            PyObject *result = PyObject_CallFunctionObjArgs(split_child, node,
                                                            position_object, child, NULL);
            Py_DECREF(position_object);
            if (result == NULL) {
                goto error;
            }
            Py_DECREF(result);
            /* The middle item went up into items[position]. */
            equal = replace_equal(items, position, key, item);
            if (equal < 0) {
                goto error;
            }
            if (equal) {
                done = 1;
                break;
            }
            PyObject *middle = item_key(PyList_GET_ITEM(items, position));
            if (middle == NULL) {
                goto error;
            }
            int below = PyObject_RichCompareBool(middle, key, Py_LT);
            Py_DECREF(middle);
            if (below < 0) {
                goto error;
            }
            if (below) {
                position += 1;
            }
            if (position >= PyList_GET_SIZE(nodes)) {
                PyErr_SetString(PyExc_RuntimeError, "a split left no child to descend into");
                goto error;
            }
            Py_SETREF(child, Py_NewRef(PyList_GET_ITEM(nodes, position)));
            Py_SETREF(child_items, get_items(child));
            if (child_items == NULL) {
                goto error;
            }
        }
        if (PyList_Append(path, node) < 0) {
            goto error;
        }
        Py_CLEAR(nodes);
        Py_SETREF(node, child);
        child = NULL;
        Py_SETREF(items, child_items);
        child_items = NULL;
    }

    /* A new key: every node on the way down holds one item more. */
    if (!done) {
        Py_ssize_t size = PyList_GET_SIZE(path);
        for (Py_ssize_t i = 0; i < size; i++) {
            PyObject *above = PyList_GET_ITEM(path, i);
            if (note_node_change(above) < 0) {
                goto error;
            }
            PyObject *count = PyObject_GetAttr(above, str_count);
            if (count == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                    goto error;
                }
                PyErr_Clear(); /* a node written by Durus 4.3 keeps no count */
                continue;
            }
            PyObject *more = PyNumber_Add(count, long_one);
            Py_DECREF(count);
            if (more == NULL) {
                goto error;
            }
            int failed = PyObject_GenericSetAttr(above, str_count, more);
            Py_DECREF(more);
            if (failed < 0) {
                goto error;
            }
        }
    }
    Py_XDECREF(nodes);
    Py_DECREF(items);
    Py_DECREF(node);
    Py_DECREF(path);
    Py_RETURN_TRUE;

error:
    Py_XDECREF(child_items);
    Py_XDECREF(child);
    Py_XDECREF(nodes);
    Py_XDECREF(items);
    Py_XDECREF(node);
    Py_XDECREF(path);
    return NULL;
}

/* --- module functions ---------------------------------------------------- */

static PyObject *
module_getattribute(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "_getattribute() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    return PyObject_GenericGetAttr(args[0], args[1]);
}

static PyObject *
module_setattribute(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError,
                     "_setattribute() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (PyObject_GenericSetAttr(args[0], args[1], args[2]) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
module_delattribute(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "_delattribute() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (PyObject_GenericSetAttr(args[0], args[1], NULL) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
module_ghost_class(PyObject *module, PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_Format(PyExc_TypeError, "_ghost_class() takes a class, not %R", cls);
        return NULL;
    }
    PyTypeObject *ghost = ghost_class_of((PyTypeObject *)cls);
    return ghost == NULL ? NULL : Py_NewRef((PyObject *)ghost);
}

static PyObject *
module_user_class(PyObject *module, PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (is_ghost_type(type)) {
        type = type->tp_base;
    }
    return Py_NewRef((PyObject *)type);
}

static int
untouch(PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (!PyObject_TypeCheck(obj, &PersistentBase_Type)) {
        PyErr_Format(PyExc_TypeError, "%R is not a persistent object", obj);
        return -1;
    }
    if (is_ghost_type(type)) {
        return 0;
    }
    PyTypeObject *ghost = ghost_class_of(type);
    if (ghost == NULL) {
        return -1;
    }
    return ghost == type ? 0 : set_class(obj, ghost);
}

static PyObject *
module_untouch(PyObject *module, PyObject *obj)
{
    if (untouch(obj) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
module_untouch_all(PyObject *module, PyObject *objects)
{
    PyObject *sequence = PySequence_Fast(objects, "_untouch_all() takes an iterable");
    if (sequence == NULL) {
        return NULL;
    }
    Py_ssize_t size = PySequence_Fast_GET_SIZE(sequence);
    for (Py_ssize_t i = 0; i < size; i++) {
        if (untouch(PySequence_Fast_GET_ITEM(sequence, i)) < 0) {
            Py_DECREF(sequence);
            return NULL;
        }
    }
    Py_DECREF(sequence);
    Py_RETURN_NONE;
}

static PyObject *
module_retouch(PyObject *module, PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (is_ghost_type(type) && set_class(obj, type->tp_base) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"_getattribute", (PyCFunction)(void (*)(void))module_getattribute,
     METH_FASTCALL, "Read an attribute without the persistent hooks."},
    {"_setattribute", (PyCFunction)(void (*)(void))module_setattribute,
     METH_FASTCALL, "Set an attribute without the persistent hooks."},
    {"_delattribute", (PyCFunction)(void (*)(void))module_delattribute,
     METH_FASTCALL, "Delete an attribute without the persistent hooks."},
    {"_ghost_class", module_ghost_class, METH_O,
     "Return the ghost class of a persistent class (made once)."},
    {"_user_class", module_user_class, METH_O,
     "Return the persistent class of an object, touched or not."},
    {"_untouch", module_untouch, METH_O,
     "Give an object its ghost class: its next access is noted again."},
    {"_untouch_all", module_untouch_all, METH_O, "_untouch() each object."},
    {"_persistent_id_filter", module_persistent_id_filter, METH_O,
     "Return a callable that calls func(obj) only for persistent objects."},
    {"_btree_add", (PyCFunction)(void (*)(void))module_btree_add, METH_FASTCALL,
     "The descent of BTree.add; False (nothing done) when the root is full."},
    {"_retouch", module_retouch, METH_O,
     "Give an object its own class back without loading or noting anything."},
    {NULL},
};

static struct PyModuleDef persistent_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dhruva._persistent",
    .m_doc = "The C accelerator of dhruva.persistent (see dhruva._persistent_py).",
    .m_size = -1,
    .m_methods = module_methods,
};

static int
intern_strings(void)
{
#define INTERN(var, text)                                  \
    if ((var = PyUnicode_InternFromString(text)) == NULL) { \
        return -1;                                         \
    }
    INTERN(str_p_load_state, "_p_load_state");
    INTERN(str_p_note_change, "_p_note_change");
    INTERN(str_p_set_status_unsaved, "_p_set_status_unsaved");
    INTERN(str_p_connection, "_p_connection");
    INTERN(str_note_access, "note_access");
    INTERN(str_note_change, "note_change");
    INTERN(str_transaction_serial, "transaction_serial");
    INTERN(str_class, "__class__");
    INTERN(str_repr, "__repr__");
    INTERN(str_setstate, "__setstate__");
    INTERN(str_ghost_class_key, "__dhruva_ghost_class__");
    INTERN(str_make_ghost_class, "make_ghost_class");
    INTERN(str_p_fast_reads, "_p_fast_reads");
    INTERN(str_fast_reads, "fast_reads");
    INTERN(str_init_subclass, "init_subclass");
    INTERN(str_getattribute, "__getattribute__");
    INTERN(str_items, "items");
    INTERN(str_nodes, "nodes");
    INTERN(str_count, "_count");
    INTERN(str_minimum_degree, "minimum_degree");
#undef INTERN
    return 0;
}

PyMODINIT_FUNC
PyInit__persistent(void)
{
    if (intern_strings() < 0) {
        return NULL;
    }
    if (empty_tuple == NULL && (empty_tuple = PyTuple_New(0)) == NULL) {
        return NULL;
    }
    if (long_one == NULL && (long_one = PyLong_FromLong(1)) == NULL) {
        return NULL;
    }
    GhostBase_Type.tp_base = &PersistentBase_Type;
    if (PyType_Ready(&ConnectionBase_Type) < 0 ||
        PyType_Ready(&PersistentBase_Type) < 0 ||
        PyType_Ready(&GhostBase_Type) < 0 || PyType_Ready(&IdFilter_Type) < 0) {
        return NULL;
    }
    /* Default classes read through the hook (see dhruva.persistent). */
    if (PyDict_SetItem(PersistentBase_Type.tp_dict, str_p_fast_reads, Py_False) <
        0) {
        return NULL;
    }
    PyType_Modified(&PersistentBase_Type);
    default_note_change = _PyType_Lookup(&PersistentBase_Type, str_p_note_change);
    if (default_note_change == NULL) {
        PyErr_SetString(PyExc_SystemError, "_p_note_change is missing");
        return NULL;
    }
    Py_INCREF(default_note_change);

    PyObject *module = PyModule_Create(&persistent_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "GHOST", STATUS_GHOST) < 0 ||
        PyModule_AddIntConstant(module, "SAVED", STATUS_SAVED) < 0 ||
        PyModule_AddIntConstant(module, "UNSAVED", STATUS_UNSAVED) < 0 ||
        PyModule_AddObjectRef(module, "ConnectionBase",
                              (PyObject *)&ConnectionBase_Type) < 0 ||
        PyModule_AddObjectRef(module, "PersistentBase",
                              (PyObject *)&PersistentBase_Type) < 0 ||
        PyModule_AddObjectRef(module, "GhostBase", (PyObject *)&GhostBase_Type) <
            0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
